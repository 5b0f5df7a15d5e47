"""Per-expert formats in RAM (edgemoe.bitwidth.apply) against the converter and the
offloaded runtime: same sizes, same codes, same tokens."""

from __future__ import annotations

import json

import pytest
import torch

import edgemoe
from edgemoe.api import Engine
from edgemoe.bitwidth.apply import ExpertVariants, assignment, load_planned, plan_bytes, stored_bytes, to_plan
from edgemoe.checkpoint import load_hf
from edgemoe.errors import EdgeMoEError
from edgemoe.experts import DenseExpert
from edgemoe.store.manifest import ExpertPlan, read_manifest
from edgemoe.tokenizer import Tokenizer

from bitwidth.helpers import SHAPE, make_hf
from store.helpers import PROMPTS, make_converted, min_budget, run_prompts

H = I = 128
# Every quantized family, both zero-point kinds, and float: blobs of seven sizes. (A float
# format other than the compute dtype would compute in its own dtype in the store.)
MIXED = {(0, 0): "int2", (0, 1): "int3", (0, 2): "int4-asym", (0, 3): "int8",
         (1, 0): "int2-asym", (1, 1): "int4", (1, 2): "fp32", (1, 3): "int3-asym",
         (2, 0): "int4", (2, 1): "int2", (2, 2): "int3", (2, 3): "int8"}


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tokenizer_dir):
    return make_hf(tmp_path_factory.mktemp("apply") / "hf", tokenizer_dir)


@pytest.fixture(scope="module")
def mixed_plan(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(json.dumps(to_plan(MIXED, "fp32")))
    return path


@pytest.fixture(scope="module")
def converted(hf, mixed_plan, tmp_path_factory):
    return make_converted(hf, tmp_path_factory.mktemp("conv") / "conv", plan=mixed_plan)


def test_stored_bytes_are_the_stores(converted):
    """The planner's sizes are the store's: padded blob lengths, format by format."""
    m = read_manifest(converted)
    assert {e.key: e.format for e in m.experts} == MIXED
    for e in m.experts:
        assert e.length == stored_bytes(e.format, H, I)
        assert e.length % 4096 == 0 and e.size <= e.length < e.size + 4096
    assert m.expert_bytes == plan_bytes(MIXED, H, I)
    # 3 bits per weight packed: int3 is exactly 3/4 of int4's code bytes.
    assert stored_bytes("int3", 4096, 14336) < stored_bytes("int4", 4096, 14336) * 0.78


def test_plan_json_round_trips(mixed_plan):
    plan = ExpertPlan.read(mixed_plan)
    assert assignment(plan, [0, 1, 2], 4) == MIXED
    d = to_plan(MIXED, "int2", meta={"note": 1})
    assert d["default"] == "int2" and d["meta"] == {"note": 1} and "0.0" not in d["experts"]
    assert assignment(ExpertPlan.from_dict(d, "x"), [0, 1, 2], 4) == MIXED


def test_mixed_store_offloaded_gives_the_in_ram_tokens(hf, mixed_plan, converted):
    """The same mixed-bit model, in RAM (plan applied by ExpertVariants) and converted +
    run through the offloaded runtime with a small cache: same greedy tokens."""
    model, _, formats = load_planned(hf, mixed_plan)
    assert formats == MIXED
    ram = Engine(model, Tokenizer(hf, eos_token_ids=model.args.eos_ids), hf)
    want = run_prompts(ram)
    ram.close()
    lo = min_budget(converted)
    for memory, policy in ((lo, "lru"), (lo + 200_000, "edgemoe"), (None, "lfu")):
        engine = edgemoe.load(converted, memory=memory, cache_policy=policy)
        try:
            assert run_prompts(engine) == want, (memory, policy)
            if memory == lo:
                assert engine.provider.stats()["evictions"] > 0  # the small cache really had to make room
        finally:
            engine.close()
    engine = edgemoe.load(converted, mode="io-free")
    try:
        assert run_prompts(engine) == want
    finally:
        engine.close()
    # And the plan matters: the unquantized model gives other logits.
    plain = edgemoe.load(hf)
    x = torch.tensor([PROMPTS[0]])
    assert not torch.allclose(plain.model(x), model(x))
    plain.close()


def test_variants_float_formats(hf, tmp_path, tokenizer_dir):
    model, _ = load_hf(hf)  # fp32 checkpoint, fp32 compute
    v = ExpertVariants(model)
    k = (0, 0)
    assert v.expert(k, "fp32") is not v.originals[k]  # Format.expert: the store's own arithmetic
    assert v.expert(k, "bf16") is not v.originals[k]  # fp32 weights are not bf16 values
    g, u, d = v.weights(k)
    e = v.expert(k, "bf16")
    assert isinstance(e, DenseExpert) and torch.equal(e.w2, d.to(torch.bfloat16).float())
    assert v.expert(k, "int4") is v.expert(k, "int4")  # cached
    # A bf16 checkpoint computed in float32: its bf16 format is the original itself.
    hb = make_hf(tmp_path / "bf16", tokenizer_dir, dtype=torch.bfloat16)
    mb, _ = load_hf(hb, "float32")
    vb = ExpertVariants(mb)
    assert vb.expert(k, "bf16") is vb.originals[k]
    assert vb.dtype == torch.float32


def test_load_planned_checks_the_plan(hf, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "default": "int4", "experts": {"0.9": "int2"}}))
    with pytest.raises(EdgeMoEError, match="no layer 0 expert 9"):
        load_planned(hf, bad)
    assert SHAPE["hidden_size"] == H
