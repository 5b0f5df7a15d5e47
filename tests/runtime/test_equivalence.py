"""Offloaded runs give exactly the in-RAM engine's greedy tokens: every family, every cache
policy, budgets from the minimum to unlimited, both modes, mixed and quantized formats."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import edgemoe
from edgemoe.errors import EdgeMoEError
from edgemoe.runtime.policies import POLICIES
from edgemoe.store.manifest import ExpertPlan

from store.helpers import PROMPTS, make_checkpoint, make_converted, min_budget, reference, run_prompts

# The first four families (Llama-style, HF fused layout (E, 2I, H)); the families added
# later have their own checks in tests/models/families/ and test_family_parity.py.
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
CASES = [(f, "float32") for f in sorted(FAMILIES)] + [(f, "bfloat16") for f in sorted(FAMILIES)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{d}" for f, d in CASES])
def case(request, tmp_path_factory, tokenizer_dir):
    family, dtype = request.param
    d = tmp_path_factory.mktemp(f"{family}-{dtype}")
    hf = make_checkpoint(d / "hf", family, tokenizer_dir, dtype=getattr(torch, dtype))
    trace = d / "routing.npz"
    ref = reference(hf, trace)
    conv = make_converted(hf, d / "conv")
    engine = edgemoe.load(conv)
    info = engine.info  # a budget that holds every expert: what any budget holds besides the cache, plus them all
    total = info["min_budget_bytes"] - info["min_cache_bytes"] + info["expert_bytes"]
    engine.close()
    return SimpleNamespace(family=family, dtype=dtype, hf=hf, conv=conv, ref=ref, trace=trace,
                           min=min_budget(conv), total=total)


def _budgets(case) -> dict:
    return {"min": case.min, "mid": (case.min + case.total) // 2, "unlimited": None}


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("budget", ["min", "mid", "unlimited"])
def test_offloaded_tokens_match_in_ram(case, policy, budget):
    memory = _budgets(case)[budget]
    engine = edgemoe.load(case.conv, memory=memory, cache_policy=policy,
                          trace=case.trace if policy == "belady" else None)
    try:
        stats = []
        tokens = []
        for p in PROMPTS:
            r = engine.generate(p, max_tokens=8, ignore_eos=True)
            tokens.append(r.token_ids)
            stats.append(r.stats.extra)
    finally:
        engine.close()
    assert tokens == case.ref
    s = stats[0]
    assert s["misses"] > 0 and s["bytes_read"] > 0
    assert s["cache_peak_bytes"] <= s["cache_bytes"]
    if memory is not None:
        assert s["budget_used_bytes"] <= memory
    if budget == "min":
        assert s["evictions"] > 0  # the minimal cache really had to make room
    if budget == "unlimited":
        assert stats[1]["hit_rate"] > stats[0]["hit_rate"] or stats[1]["misses"] < stats[0]["misses"]


def test_io_free_matches_in_ram(case):
    engine = edgemoe.load(case.conv, mode="io-free")
    try:
        assert engine.info["load_bytes_read"] >= engine.info["expert_bytes"]
        results = [engine.generate(p, max_tokens=8, ignore_eos=True) for p in PROMPTS]
    finally:
        engine.close()
    assert [r.token_ids for r in results] == case.ref
    s = results[0].stats.extra
    assert s["misses"] == 0 and s["bytes_read"] == 0 and s["hit_rate"] == 1.0


def test_mixed_formats_offloaded_match_io_free(tmp_path, tokenizer_dir):
    """Experts of different sizes in one store (fp32, bf16, fp16): the variable-size
    allocator, including compaction, gives the same tokens as everything in RAM."""
    hf = make_checkpoint(tmp_path / "hf", "mixtral", tokenizer_dir, num_local_experts=6, num_hidden_layers=4)
    plan = ExpertPlan("fp32", layers={1: "bf16"},
                      experts={(0, 1): "bf16", (0, 4): "fp16", (2, 0): "fp16", (2, 5): "bf16", (3, 3): "bf16"})
    conv = make_converted(hf, tmp_path / "conv", plan=plan)
    engine = edgemoe.load(conv, mode="io-free")
    ref = run_prompts(engine)
    engine.close()
    lo = min_budget(conv)
    compactions = 0
    for policy in ("lru", "lfu", "edgemoe"):
        for memory in (lo, lo + 60_000, lo + 150_000, None):
            engine = edgemoe.load(conv, memory=memory, cache_policy=policy)
            try:
                tokens = []
                for p in PROMPTS:
                    r = engine.generate(p, max_tokens=8, ignore_eos=True)
                    tokens.append(r.token_ids)
                    compactions += r.stats.extra["compactions"]
                    assert r.stats.extra["cache_peak_bytes"] <= r.stats.extra["cache_bytes"]
            finally:
                engine.close()
            assert tokens == ref, (policy, memory)
    assert compactions > 0  # the compaction path really ran


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_offloaded_match_io_free(tmp_path, tokenizer_dir, bits):
    """--bits maps to the quantized formats; the runtime is generic over formats."""
    from edgemoe.store.convert import BITS_TO_FORMAT
    from edgemoe.quant.formats import get_format

    try:
        get_format(BITS_TO_FORMAT[bits])
    except EdgeMoEError:
        pytest.skip(f"format {BITS_TO_FORMAT[bits]} is not registered yet")
    hf = make_checkpoint(tmp_path / "hf", "mixtral", tokenizer_dir, hidden_size=128, intermediate_size=128)
    conv = make_converted(hf, tmp_path / "conv", bits=bits)
    engine = edgemoe.load(conv, mode="io-free")
    assert engine.info["formats"] == {BITS_TO_FORMAT[bits]: 12}
    ref = run_prompts(engine)
    engine.close()
    for policy in ("lru", "edgemoe"):
        engine = edgemoe.load(conv, memory=min_budget(conv), cache_policy=policy)
        try:
            assert run_prompts(engine) == ref
        finally:
            engine.close()
